"""What each ``rewardkit`` command does with its flags, one module per command family.

``cli.py`` only parses and calls these; the library functions they call (training recipes,
the generation loop, scorers) know nothing of flags.
"""
