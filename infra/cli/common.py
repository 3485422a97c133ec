"""What every family of commands shares: the one-line error and exit code 2, and configs built from options."""

from __future__ import annotations

import typer


def fail(message: str) -> typer.Exit:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    return typer.Exit(code=2)


def config_from(config_class, /, **fields):
    """The command's configuration model, its validation errors as one line of 'field: message's."""
    from pydantic import ValidationError

    try:
        return config_class(**fields)
    except ValidationError as error:
        raise fail("; ".join(validation_messages(error))) from error


def validation_messages(error) -> list[str]:
    """Pydantic's errors as 'field: message' lines, without its URLs and input dumps."""
    return [f"{'.'.join(str(part) for part in item['loc']) or 'input'}: {item['msg'].removeprefix('Value error, ')}"
            for item in error.errors()]


def numbers(text: str | None, option: str) -> list[float] | None:
    """A comma-separated option as numbers (None stays None)."""
    if text is None:
        return None
    try:
        return [float(part) for part in text.split(",")]
    except ValueError as error:
        raise fail(f"{option} {text!r}: comma-separated numbers, e.g. 0.3,0.7") from error
