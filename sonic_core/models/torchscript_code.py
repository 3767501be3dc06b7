"""What the TorchScript source of a face-detector archive may say: the reviewed allowlist.

``code/**.py`` entries of a TorchScript archive are TorchScript in Python syntax. They are parsed
with ``ast`` (never compiled or run) and walked; everything not known here is a ``Finding``:

* module level: classes (``Module`` / ``NamedTuple`` bases) and functions only;
* class bodies: attribute annotations, constant class attributes, ``__parameters__`` /
  ``__buffers__`` lists, ``__annotations__["0"] = <type>`` (Sequential items), methods;
* calls: ``TENSOR_OPS`` as ``torch.op``, ``ops.aten.op`` or ``torch.ops.aten.op``; ``PRIM_OPS`` as
  ``ops.prim.op``; other ``torch.ops`` namespaces never; ``BUILTIN_CALLS``; functions and classes
  the archive defines (``__torch__.*``, also through a local alias ``_0 = __torch__.a.f``);
  methods that the archive's classes define and that are not named like an aten op;
  ``getattr(x, "23")`` only with a plain, non-dunder literal name (traced submodule access);
* names: locals and parameters only, plus ``CONSTANTS.c<N>`` (traced constants); no dunder
  attributes, no bare ``torch`` / ``ops`` references, no lambdas, comprehensions or imports;
* ``__setstate__`` (run at load) only ``self.x = state[i]``, ``__getstate__`` only reads + return.

Why these ops: they are what torch writes when a YOLOv5-face detector (StemBlock/Focus, Conv+BN+
SiLU/LeakyReLU/Hardswish, C3/BottleneckCSP, SPP/SPPF, nearest Upsample, Concat, Detect with grids
and anchors) is traced or scripted (tests/_yoloface.py builds every variant), plus a few reviewed
spellings of the same operations. ``yoloface_manifest.json`` beside this file records each group
and why; the tests keep the two equal. Every op computes on tensors, numbers, lists and strings in
memory; none opens files, maps storage from files, starts processes or touches the network.
"""

from __future__ import annotations

import ast
import collections
import re
from dataclasses import dataclass, field

import torch

TENSOR_OPS = frozenset({
    # convolution, batch norm, max pool (traced: _convolution; scripted: conv2d)
    "_convolution", "conv2d", "batch_norm", "max_pool2d",
    # nearest upsampling; the other modes are branches of the scripted F.interpolate body that
    # torch writes for every nn.Upsample (not taken for "nearest"); __interpolate: older torch
    "upsample_nearest2d", "upsample_nearest1d", "upsample_nearest3d", "_upsample_nearest_exact1d",
    "_upsample_nearest_exact2d", "_upsample_nearest_exact3d", "upsample_linear1d", "upsample_bilinear2d",
    "upsample_bicubic2d", "upsample_trilinear3d", "_upsample_bilinear2d_aa", "_upsample_bicubic2d_aa",
    "_upsample_lanczos2d_aa", "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d",
    "__interpolate",
    # activations: modules, their in-place forms, export-friendly x*sigmoid(x), x*hardtanh(x+3)/6
    "silu", "silu_", "sigmoid", "sigmoid_", "leaky_relu", "leaky_relu_", "hardswish", "hardswish_",
    "hardtanh", "hardtanh_",
    # arithmetic and comparisons (tensors and scalars), TorchScript's boolean helpers
    "add", "add_", "sub", "rsub", "mul", "div", "pow", "neg", "floor", "eq", "ne", "lt", "le", "gt", "ge",
    "__is__", "__isnot__", "__not__", "__contains__",
    # shapes, views, slicing, indexing, in-place writes into slices, joining
    "size", "dim", "len", "view", "reshape", "permute", "contiguous", "slice", "select", "index",
    "index_put_", "copy_", "unsqueeze", "squeeze", "flatten", "transpose", "expand", "repeat", "clone",
    "detach", "cat", "stack",
    # tensors created in memory, dtype/device moves
    "zeros", "ones", "full", "full_like", "zeros_like", "ones_like", "arange", "meshgrid", "tensor", "to",
    "device",
    # lists and strings as TorchScript prints them (error messages, warnings)
    "append", "list", "format", "warn",
})
PRIM_OPS = frozenset({"NumToTensor", "RaiseException", "device", "dtype"})
OP_NAMESPACES = {"aten": TENSOR_OPS, "prim": PRIM_OPS}  # any other torch.ops namespace is refused
BUILTIN_CALLS = frozenset({"int", "float", "bool", "str", "len", "range", "getattr", "annotate",
                           "unchecked_cast", "uninitialized", "isinstance"})
TYPE_NAMES = frozenset({"Tensor", "int", "float", "bool", "str", "NoneType", "List", "Optional", "Tuple",
                        "Dict", "Final", "Device", "Any", "Union", "number"})
CLASS_BASES = frozenset({"Module", "NamedTuple"})
CLASS_LISTS = frozenset({"__parameters__", "__buffers__", "__constants__"})
RESERVED_MODULE = "__torch__.torch.classes"  # custom C++ classes: never taken from the archive
DUNDER_METHODS = frozenset({"__init__", "__len__", "__getitem__", "__getstate__", "__setstate__"})
PLAIN_NAME = re.compile(r"[A-Za-z0-9_]+")




@dataclass(frozen=True)
class Finding:
    entry: str  # zip entry below the archive folder, e.g. "code/__torch__/models/yolo.py"
    line: int | None
    what: str

    def __str__(self) -> str:
        return f"{self.entry}{f':{self.line}' if self.line else ''}: {self.what}"


@dataclass
class CheckedArchive:
    """What the check saw: classes (with their methods) and functions defined, calls made, storages."""

    classes: dict[str, set[str]] = field(default_factory=dict)
    functions: set[str] = field(default_factory=set)
    ops: collections.Counter = field(default_factory=collections.Counter)  # "torch.cat": calls
    storages: set[str] = field(default_factory=set)
    findings: list[Finding] = field(default_factory=list)

    def refuse(self, entry: str, node: ast.AST | None, what: str) -> None:
        self.findings.append(Finding(entry, getattr(node, "lineno", None), what))


def _dotted(node: ast.AST | None) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base else None
    return None


def _is_int_index(node: ast.AST, base: str | None) -> bool:
    """``(base)[<int>]``, the only right-hand side a __setstate__ may assign."""
    return (isinstance(node, ast.Subscript) and base is not None and _dotted(node.value) == base
            and isinstance(node.slice, ast.Constant) and isinstance(node.slice.value, int))


def _builtin_op(name: str) -> bool:
    """True for a name TorchScript could resolve to a builtin op or Tensor method (not ours)."""
    schemas = getattr(torch._C, "_jit_get_schemas_for_operator", None)  # private: absent means stricter
    return name not in TENSOR_OPS and (hasattr(torch.Tensor, name) or schemas is None
                                       or bool(schemas(f"aten::{name}")))


class _CodeChecker:
    """Walks one parsed code entry; every construct it does not know is a finding."""

    def __init__(self, archive: CheckedArchive, entry: str, methods: set[str]):
        self.a, self.entry, self.methods = archive, entry, methods
        self.locals: set[str] = set()
        self.aliases: set[str] = set()

    def bad(self, node: ast.AST, what: str) -> None:
        self.a.refuse(self.entry, node, what)

    def module(self, tree: ast.Module) -> None:
        for stmt in tree.body:
            if isinstance(stmt, ast.ClassDef):
                self.class_def(stmt)
            elif isinstance(stmt, ast.FunctionDef):
                self.function(stmt)
            elif not (isinstance(stmt, ast.Assign) and _dotted(stmt.targets[0]) == "op_version_set"
                      and isinstance(stmt.value, ast.Constant) and isinstance(stmt.value.value, int)):
                self.bad(stmt, f"module-level {type(stmt).__name__} statement")

    def class_def(self, node: ast.ClassDef) -> None:
        bases = [_dotted(b) for b in node.bases]
        if node.decorator_list or node.keywords or any(b not in CLASS_BASES for b in bases):
            self.bad(node, f"class {node.name} with bases {bases}, keywords or decorators")
        for stmt in node.body:
            target = stmt.targets[0] if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 else None
            if isinstance(stmt, ast.FunctionDef):
                self.function(stmt)
            elif isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                self.type_expr(stmt.annotation)  # `eps : Final[float] = 1e-05`, `conv : __torch__.X`
                if stmt.value is not None:
                    self.literal(stmt.value)
            elif _dotted(target) in CLASS_LISTS:
                self.literal(stmt.value)
            elif (isinstance(target, ast.Subscript) and _dotted(target.value) == "__annotations__"
                  and isinstance(target.slice, ast.Constant)):
                self.type_expr(stmt.value)  # __annotations__["0"] = __torch__.X (Sequential items)
            elif not isinstance(stmt, ast.Pass):
                self.bad(stmt, f"{type(stmt).__name__} statement in the body of class {node.name}")

    def function(self, node: ast.FunctionDef) -> None:
        args = node.args
        if node.decorator_list or args.vararg or args.kwarg or args.posonlyargs or args.kwonlyargs:
            self.bad(node, f"def {node.name}: decorators, *args, **kwargs or keyword-only arguments")
        if node.name.startswith("__") and node.name not in DUNDER_METHODS:
            self.bad(node, f"special method {node.name}")
        for annotation in [a.annotation for a in args.args] + [node.returns]:
            if annotation is not None:
                self.type_expr(annotation)
        for default in args.defaults:
            self.literal(default)
        params = [a.arg for a in args.args]
        if node.name in ("__setstate__", "__getstate__"):
            return self.state_method(node, params)
        stores = collections.Counter(n.id for n in ast.walk(node)
                                     if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store))
        self.locals = set(params) | set(stores)
        # `_0 = __torch__.a.f` binds a function of the archive; that name must be bound by nothing else
        aliases = [s.targets[0].id for s in ast.walk(node) if isinstance(s, ast.Assign) and len(s.targets) == 1
                   and isinstance(s.targets[0], ast.Name) and (_dotted(s.value) or "").startswith("__torch__.")]
        self.aliases = {n for n in aliases if stores[n] == aliases.count(n)}
        self.block(node.body)

    def state_method(self, node: ast.FunctionDef, params: list[str]) -> None:
        """``__setstate__``: only ``self.x = (state)[i]``; ``__getstate__``: only ``x = self.x``, return."""
        state = params[1] if len(params) == 2 else None
        for stmt in node.body:
            assign = isinstance(stmt, ast.Assign) and len(stmt.targets) == 1
            if node.name == "__setstate__":
                ok = (assign and isinstance(stmt.targets[0], ast.Attribute)
                      and _dotted(stmt.targets[0].value) == "self" and _is_int_index(stmt.value, state)) or (
                    isinstance(stmt, ast.Return) and (stmt.value is None or (
                        isinstance(stmt.value, ast.Constant) and stmt.value.value is None)))
            else:
                ok = (assign and isinstance(stmt.targets[0], ast.Name) and isinstance(stmt.value, ast.Attribute)
                      and _dotted(stmt.value.value) == "self") or (isinstance(stmt, ast.Return) and all(
                          isinstance(n, (ast.Name, ast.Load, ast.Tuple)) for n in ast.walk(stmt.value or ast.Tuple())))
            if not (ok or isinstance(stmt, ast.Pass)):
                self.bad(stmt, f"{node.name} does more than plain attribute assignments "
                               f"({ast.unparse(stmt).splitlines()[0][:80]!r})")

    def block(self, body: list[ast.stmt]) -> None:
        for stmt in body:
            if isinstance(stmt, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
                targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
                for t in targets:
                    self.target(t)
                if isinstance(stmt, ast.AnnAssign):
                    self.type_expr(stmt.annotation)
                alias = len(targets) == 1 and isinstance(targets[0], ast.Name) and targets[0].id in self.aliases
                if stmt.value is not None:
                    self.torch_ref(stmt.value) if alias else self.expr(stmt.value)
            elif isinstance(stmt, (ast.Return, ast.Expr)):
                if stmt.value is not None:
                    self.expr(stmt.value)
            elif isinstance(stmt, (ast.If, ast.While)):
                self.expr(stmt.test)
                self.block(stmt.body + stmt.orelse)
            elif isinstance(stmt, ast.For) and not stmt.orelse:
                self.target(stmt.target)
                self.expr(stmt.iter)
                self.block(stmt.body)
            elif not isinstance(stmt, (ast.Pass, ast.Break, ast.Continue)):
                self.bad(stmt, f"{type(stmt).__name__} statement")

    def target(self, node: ast.AST) -> None:
        if isinstance(node, (ast.Tuple, ast.List)):
            for elt in node.elts:
                self.target(elt)
        elif isinstance(node, (ast.Attribute, ast.Subscript)):
            self.expr(node)
        elif not isinstance(node, ast.Name):
            self.bad(node, f"assignment to {type(node).__name__}")

    def expr(self, node: ast.AST) -> None:
        if isinstance(node, ast.Constant):
            return
        if isinstance(node, ast.Name):
            if node.id not in self.locals:
                self.bad(node, f"name {node.id!r} is not a local, a parameter or on the allowlist")
        elif isinstance(node, ast.Attribute):
            self.attribute(node)
        elif isinstance(node, ast.Call):
            self.call(node)
        elif isinstance(node, (ast.Tuple, ast.List, ast.Dict, ast.BinOp, ast.UnaryOp, ast.BoolOp, ast.Compare,
                               ast.IfExp, ast.Subscript, ast.Slice)):
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.expr):
                    self.expr(child)
        else:
            self.bad(node, f"{type(node).__name__} expression")

    def attribute(self, node: ast.Attribute) -> None:
        """Attribute reads on locals (``self.model``) and traced constants (``CONSTANTS.c0``)."""
        dotted, root = _dotted(node), node
        while isinstance(root, ast.Attribute):
            if root.attr.startswith("__"):
                return self.bad(node, f"dunder attribute {root.attr!r}")
            root = root.value
        if dotted and re.fullmatch(r"CONSTANTS\.c\d+", dotted):
            return
        if isinstance(root, ast.Name) and root.id not in self.locals:
            return self.bad(node, f"reference to {dotted} outside an allowed call")
        self.expr(root)

    def torch_ref(self, node: ast.AST) -> None:
        name = _dotted(node) or type(node).__name__
        if name not in self.a.functions and name not in self.a.classes:
            self.bad(node, f"{name} is not defined in the archive's code")

    def call(self, node: ast.Call) -> None:
        func, name = node.func, _dotted(node.func)
        root = name.split(".")[0] if name else None
        args = list(node.args)
        if any(isinstance(a, ast.Starred) for a in args) or any(k.arg is None for k in node.keywords):
            return self.bad(node, "*args or **kwargs in a call")
        if root in ("torch", "ops") and root not in self.locals:
            self.op(node, name)
        elif root == "__torch__":
            self.torch_ref(func)
        elif isinstance(func, ast.Name) and func.id in self.aliases:
            pass
        elif isinstance(func, ast.Name) and func.id in BUILTIN_CALLS and func.id not in self.locals:
            literal = args[1:] and isinstance(args[1], ast.Constant) and isinstance(args[1].value, str)
            if func.id == "getattr" and not (len(args) == 2 and literal and PLAIN_NAME.fullmatch(args[1].value)
                                              and not args[1].value.startswith("__")):
                return self.bad(node, "getattr with a name that is not a plain literal")
            if func.id in ("annotate", "unchecked_cast", "uninitialized", "isinstance") and args:
                self.type_expr(args.pop(-1 if func.id == "isinstance" else 0))  # the type argument
            self.a.ops[func.id] += 1
        elif isinstance(func, ast.Attribute) and (name is None or root in self.locals):
            self.method(node, func)
        else:
            self.bad(node, f"call to {name or type(func).__name__}: not on the allowlist")
            if not name:
                self.expr(func)  # what computes the callee, e.g. getattr(torch, "save")
        for arg in [*args, *(k.value for k in node.keywords)]:
            self.expr(arg)

    def op(self, node: ast.Call, name: str) -> None:
        parts = name.split(".")
        rest = parts[2:] if parts[:2] == ["torch", "ops"] else parts[1:] if parts[0] == "ops" else None
        if parts[0] == "torch" and len(parts) == 2:  # torch.cat is aten::cat
            ns, op = "aten", parts[1]
        elif rest is not None and len(rest) == 2:  # ops.prim.NumToTensor, torch.ops.aten.cat
            ns, op = rest
        else:
            return self.bad(node, f"call to {name}: not on the allowlist")
        if ns not in OP_NAMESPACES:
            return self.bad(node, f"op {name}: the torch.ops namespace {ns!r} is not on the allowlist")
        if op not in OP_NAMESPACES[ns]:
            return self.bad(node, f"op {name}: not on the allowlist")
        self.a.ops[name] += 1

    def method(self, node: ast.Call, func: ast.Attribute) -> None:
        """``(conv).forward(x)``: a method the archive's classes define, never named like an aten op."""
        m = func.attr
        self.expr(func.value)
        if m not in self.methods or _builtin_op(m) or (m.startswith("__") and m not in DUNDER_METHODS):
            return self.bad(node, f"method call .{m}(): not a method the archive's classes define")
        self.a.ops[f"<method>.{m}"] += 1

    def type_expr(self, node: ast.AST) -> None:
        if isinstance(node, ast.Name) and node.id not in TYPE_NAMES:
            self.bad(node, f"type {node.id!r} is not on the allowlist")
        elif isinstance(node, ast.Attribute) and (_dotted(node) or "") not in self.a.classes:
            self.bad(node, f"type {_dotted(node)} is not a class defined in the archive's code")
        elif isinstance(node, ast.Subscript):
            self.type_expr(node.value)
            self.type_expr(node.slice)
        elif isinstance(node, (ast.Tuple, ast.List)):
            for elt in node.elts:
                self.type_expr(elt)
        elif not (isinstance(node, (ast.Name, ast.Attribute)) or isinstance(node, ast.Constant)
                  and node.value is None):
            self.bad(node, f"{type(node).__name__} in a type")

    def literal(self, node: ast.AST) -> None:
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            node = node.operand
        if isinstance(node, (ast.Tuple, ast.List)):
            for elt in node.elts:
                self.literal(elt)
        elif not isinstance(node, ast.Constant):
            self.bad(node, f"{type(node).__name__} where a constant is expected")


def check_sources(sources: dict[str, ast.Module], archive: CheckedArchive) -> None:
    """Index the classes and functions that ``sources`` (entry -> parsed code) define, then check
    every entry against the allowlist; findings go to ``archive``."""
    for entry, tree in sources.items():
        module = entry[len("code/"):-len(".py")].replace("/", ".")  # code/__torch__/a/b.py -> __torch__.a.b
        if module.startswith(RESERVED_MODULE):  # torch resolves these names to its own C++ classes
            archive.refuse(entry, None, f"code under {RESERVED_MODULE} (reserved for TorchBind classes)")
            continue
        for stmt in tree.body:
            if isinstance(stmt, ast.ClassDef):
                archive.classes[f"{module}.{stmt.name}"] = {f.name for f in stmt.body
                                                           if isinstance(f, ast.FunctionDef)}
            elif isinstance(stmt, ast.FunctionDef):
                archive.functions.add(f"{module}.{stmt.name}")
    methods = set().union(*archive.classes.values())
    for entry, tree in sources.items():
        _CodeChecker(archive, entry, methods).module(tree)
