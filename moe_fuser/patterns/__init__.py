"""MoE pattern families: each module recognises one way MoE layers are written and turns it into Matches.

``base`` holds the interface and the registry (``register_pattern``); ``routers`` recognises routers for every
family; the family modules (``handwritten``, ...) register their patterns when first needed.
"""

from .base import (Match, MatchContext, Pattern, Rejection, patterns_for, register_pattern, registered_patterns,
                   unregister_pattern)

__all__ = ["Match", "MatchContext", "Pattern", "Rejection", "patterns_for", "register_pattern",
           "registered_patterns", "unregister_pattern"]
