"""FX helpers shared by the pattern families and the rewrite.

- ``graph``: canonical op names across call_function/call_method/ATen, fake values, parameter and module paths
- ``dag``: a networkx view with mutation edges (in-place updates become dependencies)
- ``region``: the closure proof a region must pass before it is replaced
"""
