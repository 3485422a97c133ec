"""What every family of commands shares: the one-line error and exit code 2, and configs built from options."""

from __future__ import annotations

import functools
import inspect
import types
import typing
from collections.abc import Callable
from typing import Annotated, Literal

import typer
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined


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


class Opt:
    """A command's option that is more than its config's field of the same name: other flags (`--batch-size`
    for model_batch_size), a default of the command's own (say why where it is given), or, when the
    option's value is not the field's (a comma-separated string for a list) or the config has no such
    field, an option of the command alone (then with its type, help and default)."""

    def __init__(self, path: str, *flags: str, type: object = None, help: str | None = None,
                 default: object = PydanticUndefined) -> None:
        self.path, self.flags, self.type, self.help, self.default = path, flags, type, help, default
        self.name = path.replace(".", "_")


def options_from(config: type[BaseModel], *specs: str | Opt) -> Callable[[Callable], Callable]:
    """The command's options, in this order, read from the config's fields: type, help (the field's
    description) and default; a required field is a required option. A dotted path ("trimap.high") reaches
    into a nested config and becomes --trimap-high. A list field with a default is a repeatable option
    that, when not given, leaves the field to its default (shown in the help when not empty). The command
    is called with the config's field names, nested fields as dicts, so that `config_from(config,
    **fields)` builds it."""
    options = [spec if isinstance(spec, Opt) else Opt(spec) for spec in specs]
    parameters, unset = zip(*(_parameter(config, option) for option in options)) if options else ((), ())

    def declare(command: Callable) -> Callable:
        @functools.wraps(command)
        def call(**values: object) -> object:
            fields: dict = {}
            for option, leave_unset in zip(options, unset):
                if leave_unset and values[option.name] is None:
                    continue  # not given: the field's own default
                *outer, name = option.path.split(".")
                target = fields
                for part in outer:
                    target = target.setdefault(part, {})
                target[name] = values[option.name]
            return command(**fields)

        call.__signature__ = inspect.Signature(parameters)
        return call

    return declare


def _parameter(config: type[BaseModel], option: Opt) -> tuple[inspect.Parameter, bool]:
    """The option's parameter, and whether a None from it means "not given" (a list field's default)."""
    field = _field(config, option.path)
    if field is None and option.type is None:
        raise TypeError(f"{config.__name__} has no field {option.path!r}: give the option's type, help and default")
    typed = option.type if option.type is not None else _option_type(field.annotation)
    described = option.help if option.help is not None else field.description
    shown: bool | str = True
    unset = False
    if option.default is not PydanticUndefined:
        default = option.default
    elif field is None or field.is_required():
        default = inspect.Parameter.empty
    else:
        default = field.get_default(call_default_factory=True)
        if isinstance(default, list):
            # None, not the list, as the repeatable option's default (typer's way for a list): None stands
            # for "not given", and the config applies the field's own default.
            shown = ", ".join(str(value) for value in default) if default else False
            default, typed, unset = None, typed | None, True
    option_info = typer.Option(*option.flags, help=described, show_default=shown)
    return inspect.Parameter(option.name, inspect.Parameter.KEYWORD_ONLY, default=default,
                             annotation=Annotated[typed, option_info]), unset


def _field(config: type[BaseModel], path: str) -> FieldInfo | None:
    *outer, name = path.split(".")
    for part in outer:
        config = config.model_fields[part].annotation
    return config.model_fields.get(name)


def _option_type(annotation: object) -> object:
    """The field's type as typer parses it. Constraints are left to pydantic, whose messages the commands
    print; a Literal is read as text for the same reason."""
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _option_type(typing.get_args(annotation)[0])
    if origin is Literal:
        return str
    if origin is list:
        return list[_option_type(typing.get_args(annotation)[0])]
    if origin in (typing.Union, types.UnionType):
        kinds = [kind for kind in typing.get_args(annotation) if kind is not type(None)]
        inner = _option_type(kinds[0])
        return inner | None if len(kinds) < len(typing.get_args(annotation)) else inner
    return annotation
