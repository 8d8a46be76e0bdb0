"""
Coercions for command-line options: twistd's and the apps'.  Each carries
the C{coerceDoc} that usage.Options shows in --help.
"""


def positive_int(value):
    number = int(value)
    if number < 1:
        raise ValueError(f"{value} is not a positive whole number")
    return number


positive_int.coerceDoc = "A positive whole number."


def seconds(value):
    number = float(value)
    if not number >= 0:
        raise ValueError(f"{value} is not a number of seconds")
    return number


seconds.coerceDoc = "Seconds (decimals allowed)."


def rate(value):
    number = float(value)
    if not number >= 0:
        raise ValueError(f"{value} is not a rate")
    return number


rate.coerceDoc = "Per second (decimals allowed); 0 for no limit."
