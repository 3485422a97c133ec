-- The subject filter as DuckDB statements, run in order by datasets/openimages.py, which fills in the names in braces.
-- A box's code is the first rule that removes it: 0 missing value, 1 unknown class, 2 coordinate out of
-- range, 3 empty box, 4 group-of, 5 inside, 6 aspect, 7 area; 8 passed; 9 a malformed line. Boxes are grouped
-- by (image, class): the group rule needs a class's count of boxes in an image (invalid ones too), and only a
-- pair of one box can hold a subject. Invalid boxes get groups of their own (by "bad", their code), which tally
-- them at no cost to the valid ones' groups; "crowded" joins them back. A bad image id (NULL) comes first.
-- Only pairs of one box use the coordinates, so min() is their value: its state is smaller and faster than
-- any_value's, which matters here, where there are nearly as many pairs as boxes.
CREATE TEMP TABLE pairs AS
SELECT image, enum_code(class) AS idx, bad, count(*)::UINTEGER AS n, min(code) AS code,
    min(x_min) AS x_min, min(x_max) AS x_max, min(y_min) AS y_min, min(y_max) AS y_max
FROM (
    SELECT *, CASE WHEN code <= 3 OR code = 9 THEN code END AS bad FROM (
    SELECT *, CASE
        WHEN malformed THEN 9
        WHEN isnan(x_min) IS NOT FALSE OR isnan(x_max) IS NOT FALSE OR isnan(y_min) IS NOT FALSE
            OR isnan(y_max) IS NOT FALSE OR isnan(group_of) IS NOT FALSE OR isnan(inside) IS NOT FALSE
            OR class IS NULL AND ({no_label}) THEN 0
        WHEN class IS NULL THEN 1
        WHEN least(x_min, x_max, y_min, y_max) < 0 OR greatest(x_min, x_max, y_min, y_max) > 1 THEN 2
        WHEN x_max <= x_min OR y_max <= y_min THEN 3
        WHEN group_of = 1 THEN 4
        WHEN inside = 1 THEN 5
        WHEN greatest(w / h, h / w) > {max_aspect} THEN 6
        WHEN w * h < {min_area} OR w * h > {max_area} THEN 7
        ELSE 8 END::UTINYINT AS code
    FROM (
        SELECT *, x_max - x_min AS w, y_max - y_min AS h FROM (
            SELECT CASE WHEN NOT malformed AND regexp_full_match(id, '[0-9a-f]{{16}}')
                        THEN CAST('0x' || id AS UBIGINT) END AS image,
                malformed, label, coalesce(TRY_CAST(label AS class_mid), TRY_CAST(trim(label) AS class_mid)) AS class,
                {numbers}
            FROM (SELECT CAST(ImageID AS VARCHAR) AS id, CAST(LabelName AS VARCHAR) AS label,
                         {malformed} AS malformed, * FROM {source})))))
GROUP BY image, class, bad;

-- The (image, class) pairs that also hold invalid boxes: their valid boxes are never alone in their class.
CREATE TEMP TABLE crowded AS SELECT DISTINCT image, idx FROM pairs WHERE bad < 4 AND image IS NOT NULL;

-- The pairs of one box (no invalid box beside it) that pass every rule up to "human", with what removes them after.
CREATE TEMP TABLE passed AS
SELECT *, idx IN ({cluttered}) AS cluttered,
    image IN (SELECT image FROM pairs WHERE idx IN ({human}) AND image IS NOT NULL) AS human
FROM pairs ANTI JOIN crowded USING (image, idx) WHERE n = 1 AND code = 8 AND bad IS NULL AND image IS NOT NULL;

-- One subject per image: the largest key, which is the area's IEEE bits (they order like the area, areas
-- being positive), then the smallest class index (MID order) on a tie: integers, because structs are slow.
CREATE TEMP TABLE subjects AS
SELECT printf('%016x', image) AS image_id, mid AS label_mid, name AS label_name, x_min, x_max, y_min, y_max,
    (x_max - x_min) * (y_max - y_min) AS area,
    greatest((x_max - x_min) / (y_max - y_min), (y_max - y_min) / (x_max - x_min)) AS aspect
FROM (
    SELECT image, 65535 - max(key) % 65536 AS idx, arg_max(x_min, key) AS x_min, arg_max(x_max, key) AS x_max,
        arg_max(y_min, key) AS y_min, arg_max(y_max, key) AS y_max
    FROM (SELECT *, ((x_max - x_min) * (y_max - y_min))::BIT::BIGINT::HUGEINT * 65536 + 65535 - idx AS key
          FROM passed WHERE NOT human AND NOT cluttered)
    GROUP BY image)
JOIN classes USING (idx);

-- The funnel: the boxes each rule removed, each under the first rule that removes it. A box past "invalid" is
-- group-of or in a pair of several unless it is a pair of one box past "group" (and not crowded).
CREATE TEMP TABLE totals AS
SELECT rows, images, malformed_line, bad_image_id, missing_value, unknown_class, coordinate_out_of_range, empty_box,
    valid - inside - aspect - area - human - cluttered - candidates AS "group", inside, aspect, area, human, cluttered,
    candidates - (SELECT count(*) FROM subjects) AS one_per_image
FROM (SELECT *, all_inside - crowded_inside AS inside, all_aspect - crowded_aspect AS aspect,
    all_area - crowded_area AS area FROM (
    SELECT sum(n) AS rows, count(DISTINCT image) AS images, sum(n) FILTER (bad = 9) AS malformed_line,
        sum(n) FILTER (image IS NULL AND bad IS DISTINCT FROM 9) AS bad_image_id,
        sum(n) FILTER (image IS NOT NULL AND bad = 0) AS missing_value,
        sum(n) FILTER (image IS NOT NULL AND bad = 1) AS unknown_class,
        sum(n) FILTER (image IS NOT NULL AND bad = 2) AS coordinate_out_of_range,
        sum(n) FILTER (image IS NOT NULL AND bad = 3) AS empty_box,
        sum(n) FILTER (image IS NOT NULL AND bad IS NULL) AS valid,
        count(*) FILTER (image IS NOT NULL AND bad IS NULL AND n = 1 AND code = 5) AS all_inside,
        count(*) FILTER (image IS NOT NULL AND bad IS NULL AND n = 1 AND code = 6) AS all_aspect,
        count(*) FILTER (image IS NOT NULL AND bad IS NULL AND n = 1 AND code = 7) AS all_area
    FROM pairs),
    (SELECT count(*) FILTER (code = 5) AS crowded_inside, count(*) FILTER (code = 6) AS crowded_aspect,
        count(*) FILTER (code = 7) AS crowded_area
     FROM pairs SEMI JOIN crowded USING (image, idx) WHERE n = 1 AND bad IS NULL),
    (SELECT count(*) FILTER (human) AS human, count(*) FILTER (NOT human AND cluttered) AS cluttered,
        count(*) FILTER (NOT human AND NOT cluttered) AS candidates FROM passed));
