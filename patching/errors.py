"""The one exception of the patch library."""

from __future__ import annotations


class PatchError(ValueError):
    """A patch cannot be applied to this model: a block key it does not have, a parameter out of
    range, a component it lacks. Raised before anything is changed; the model stays as it was."""
