"""Answer formats shared by evaluation, serving and training: how an answer is read (tool calls,
JSON, SQL, labels), which kind of output a task produces, and the checks a served answer must pass.
One rule for each, so the parity gate judges a task by the rule the router enforces.

``fences`` (code fences), ``tool_calls`` (the one tool-call parser), ``json_answers``, ``sql``,
``labels`` (what each kind of answer is), ``kinds`` (the one output-kind rule), ``validators`` (the
router's checks), ``answers`` (a trace's answer as a comparable string).
"""
