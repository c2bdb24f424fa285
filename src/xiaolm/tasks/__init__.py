"""Tasks: each one its data, its checker and its reward together, as nanochat's ``tasks/`` keeps them.

The story-instruction task: ``constraints`` (the rule-based verifier of the constraints and repetition measures,
which ``xiaolm eval instruct`` scores with and alignment rewards with) and ``instruct`` (``xiaolm data instruct``:
instruction data whose constraints are read off the stories).

The tool tasks: ``agent`` (``xiaolm data tools``: problems needing a calculator, a calendar, unit conversion or a
city table, with reference answers, the checker and the reward), ``toolbox`` (the tools and their schemas) and
``sandbox`` (``run_tool``: how any tool call runs, limited and isolated).
"""
