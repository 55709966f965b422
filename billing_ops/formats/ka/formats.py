# Georgian: day.month.year and a 24-hour clock (as Georgian documents write them), the zone
# shown; a non-breaking space between thousands and a decimal comma (CLDR's `ka`).
DATETIME_FORMAT = "d.m.Y H:i:s T"
SHORT_DATETIME_FORMAT = "d.m.Y H:i T"
DATE_FORMAT = "d.m.Y"
SHORT_DATE_FORMAT = "d.m.Y"
TIME_FORMAT = "H:i"
FIRST_DAY_OF_WEEK = 1  # Monday
DECIMAL_SEPARATOR = ","
THOUSAND_SEPARATOR = "\xa0"
NUMBER_GROUPING = 3
