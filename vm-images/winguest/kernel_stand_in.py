"""TEMPORARY STAND-IN for isf.py until it lands (then this file goes): an empty symbols.json."""


def build_isf(profile, image, guid, age):
    return {}
