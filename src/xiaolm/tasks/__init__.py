"""Tasks: each one its data, its checker and its reward together, as nanochat's ``tasks/`` keeps them.

The story-instruction task: ``constraints`` (the rule-based verifier of the constraints and repetition measures,
which ``xiaolm eval instruct`` scores with and alignment rewards with) and ``instruct`` (``xiaolm data instruct``:
instruction data whose constraints are read off the stories).
"""
