"""AgentDojo user tasks (MIT) read from the installed package's source without importing it.

``agentdojo`` declares heavy dependencies (anthropic, cohere, google-genai, langchain, ...) that the
demo does not need, so it is installed with ``--no-deps`` and its task files are parsed with
:mod:`ast`: each ``UserTaskN`` class gives a prompt (``PROMPT``) and a gold multi-step solution
(the ``FunctionCall(function=..., args=...)`` list its ``ground_truth`` returns). Tool schemas come
from the suite's tool functions (name, first docstring paragraph, parameters the agent fills in).
"""

from __future__ import annotations

import ast
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aad_core.errors import AADError

SUITES = ("banking", "slack", "travel", "workspace")


@dataclass
class AgentDojoTask:
    suite: str
    task_id: str
    prompt: str
    #: Gold calls in order: (function name, arguments). Arguments the task computes from its
    #: environment at run time are kept as their source expression in ``"<...>"``.
    calls: list[tuple[str, dict[str, Any]]] = field(default_factory=list)


def package_dir() -> Path:
    spec = importlib.util.find_spec("agentdojo")
    if spec is None or not spec.submodule_search_locations:
        raise AADError(
            "The 'agentdojo' package (AgentDojo task suites, MIT) is not installed.",
            hint="Run 'bash scripts/setup' or 'pip install --no-deps agentdojo==0.1.35'.",
        )
    return Path(list(spec.submodule_search_locations)[0])


def _literal(node: ast.AST, names: dict[str, Any]) -> Any:
    """A node's value: a literal, a known constant (``X``/``self.X``), an f-string over those; or its source."""
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        pass
    if isinstance(node, ast.Name) and node.id in names:
        return names[node.id]
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in ("self", "cls") and node.attr in names:
        return names[node.attr]
    if isinstance(node, ast.JoinedStr):
        parts = []
        for v in node.values:
            if isinstance(v, ast.Constant):
                parts.append(str(v.value))
            elif isinstance(v, ast.FormattedValue):
                parts.append(str(_literal(v.value, names)))
        return "".join(parts)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = _literal(node.left, names), _literal(node.right, names)
        if isinstance(left, str) and isinstance(right, str):
            return left + right
    if isinstance(node, ast.Dict):
        return {str(_literal(k, names)): _literal(v, names) for k, v in zip(node.keys, node.values) if k is not None}
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_literal(e, names) for e in node.elts]
    return f"<{ast.unparse(node)}>"


def _constants(body: list[ast.stmt], names: dict[str, Any]) -> dict[str, Any]:
    out = dict(names)
    for stmt in body:
        if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
            value = _literal(stmt.value, out)
            if not (isinstance(value, str) and value.startswith("<")):
                out[stmt.targets[0].id] = value
    return out


def _in_source_order(fn: ast.FunctionDef, names: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    found = []
    for node in ast.walk(fn):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "FunctionCall":
            kw = {k.arg: k.value for k in node.keywords if k.arg}
            name = _literal(kw["function"], names) if "function" in kw else None
            args = _literal(kw["args"], names) if "args" in kw else {}
            if isinstance(name, str) and not name.startswith("<"):
                found.append(((node.lineno, node.col_offset), name, args if isinstance(args, dict) else {"args": args}))
    return [(n, a) for _, n, a in sorted(found, key=lambda f: f[0])]


def load_tasks(suites: tuple[str, ...] = SUITES, version: str = "v1") -> list[AgentDojoTask]:
    """Every user task of ``suites`` with a prompt and at least one gold call, in file order."""
    root = package_dir() / "default_suites" / version
    tasks: list[AgentDojoTask] = []
    for suite in suites:
        path = root / suite / "user_tasks.py"
        tree = ast.parse(path.read_text(encoding="utf-8"))
        module_names = _constants(tree.body, {})
        for cls in tree.body:
            if not (isinstance(cls, ast.ClassDef) and cls.name.startswith("UserTask")):
                continue
            names = _constants(cls.body, module_names)
            prompt = names.get("PROMPT")
            gt = next((f for f in cls.body if isinstance(f, ast.FunctionDef) and f.name == "ground_truth"), None)
            if not isinstance(prompt, str) or gt is None:
                continue
            calls = _in_source_order(gt, names)
            if calls:
                tasks.append(AgentDojoTask(suite=suite, task_id=f"{suite}/{cls.name}", prompt=" ".join(prompt.split()), calls=calls))
    return tasks


def load_tool_schemas(version: str = "v1") -> dict[str, dict[str, Any]]:
    """OpenAI tool schemas for every tool function of the suites, keyed by name."""
    tools: dict[str, dict[str, Any]] = {}
    for path in sorted((package_dir() / "default_suites" / version / "tools").glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for fn in tree.body:
            if not isinstance(fn, ast.FunctionDef) or fn.name.startswith("_"):
                continue
            doc = (ast.get_docstring(fn) or "").strip()
            props: dict[str, Any] = {}
            required: list[str] = []
            n_defaults = len(fn.args.defaults)
            params = fn.args.args
            for i, arg in enumerate(params):
                ann = ast.unparse(arg.annotation) if arg.annotation is not None else "str"
                if ann.startswith("Annotated"):  # environment dependency injected by the runtime
                    continue
                props[arg.arg] = {"type": _json_type(ann)}
                if i < len(params) - n_defaults:
                    required.append(arg.arg)
            tools[fn.name] = {
                "type": "function",
                "function": {
                    "name": fn.name,
                    "description": doc.split("\n\n")[0].replace("\n", " "),
                    "parameters": {"type": "object", "properties": props, "required": required},
                },
            }
    return tools


def _json_type(annotation: str) -> str:
    a = annotation.lower()
    if a.startswith(("list", "set", "tuple")):
        return "array"
    if a.startswith("dict"):
        return "object"
    for py, js in (("int", "integer"), ("float", "number"), ("bool", "boolean")):
        if a.startswith(py):
            return js
    return "string"
