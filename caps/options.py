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


def _non_negative(what, doc):
    """
    A coercion to a float of at least 0 (a NaN is refused too).
    """

    def coerce(value):
        number = float(value)
        if not number >= 0:
            raise ValueError(f"{value} is not {what}")
        return number

    coerce.coerceDoc = doc
    return coerce


seconds = _non_negative("a number of seconds", "Seconds (decimals allowed).")
rate = _non_negative("a rate", "Per second (decimals allowed); 0 for no limit.")
