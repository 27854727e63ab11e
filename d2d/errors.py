"""Errors that d2d reports to users: one line saying what is wrong and what to do."""


class D2DError(Exception):
    """A problem with the user's input or request. The CLI prints it on one line, exit code 2."""


class StageOrderError(D2DError):
    """A stage was given an artifact that lacks a stage it needs."""
