"""Errors raised for bad user input; each names the input at fault so a node can show it verbatim."""


class CIDMInputError(ValueError):
    """A user-facing input is invalid. `input_name` is the node input (or file) that caused it."""

    def __init__(self, input_name: str, message: str):
        self.input_name = input_name
        super().__init__(f"{input_name}: {message}")
