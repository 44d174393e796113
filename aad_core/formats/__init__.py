"""Answer formats shared by evaluation, serving and training: how an answer is read (tool calls,
JSON, SQL, labels), which kind of output a task produces, and the checks a served answer must pass.
One rule for each, so the parity gate judges a task by the rule the router enforces."""
