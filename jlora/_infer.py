"""Layouts from use: each weight's stacked, input and output axes, read from
how the model contracts it.

`infer_axes` traces ``fn`` once on the base tree, as `jlora.lora` does, and
follows every weight (a leaf of rank ≥ 2) through the shape-only operations
on it (casts, transposes, reshapes, slices) to its uses:

* ``dot_general``: the weight's contracting axes are inputs, its batch axes
  stacked, its free axes outputs;
* ``conv_general_dilated``: the kernel's input-feature and window axes are
  inputs, its output-feature axis the output;
* ``gather`` (an embedding lookup): the indexed axis is the input, the axes
  taken whole are outputs;
* a slice of one entry of an axis (``W[i]`` in a Python loop over stacked
  layers) or a ``scan`` over it (``nn.scan``) makes it a stacked axis.

Control flow (``jit``, ``scan``, ``cond``, ``while``, ``remat``, custom
derivatives) is followed into. Two uses that disagree on an axis are an
error naming both.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from jax.extend import core as jcore

from jlora._runtime.trace import trace
from jlora._errors import Problems
from jlora._targets import Axes
from jlora._tree import path_str

Roles = dict[int, str]  # original axis -> "stack" | "inputs" | "outputs"
_PASS = frozenset({"convert_element_type", "copy", "copy_p", "sharding_constraint",
                   "reduce_precision", "stop_gradient", "optimization_barrier"})


class _Weight:
  """One weight-derived value: which weight, and which original axes each of
  its dimensions holds (a tuple per dimension; empty for a new size-1 axis)."""

  __slots__ = ("path", "axes")

  def __init__(self, path: str, axes: tuple[tuple[int, ...], ...]):
    self.path = path
    self.axes = axes


class _Uses:
  """What the trace found: per weight, each use and the roles it gave."""

  def __init__(self):
    self.records: dict[str, list[tuple[str, str, dict[int, str]]]] = {}
    self.used: set[str] = set()

  def record(self, w: _Weight, roles: dict[int, str], use: str, *, kind: str) -> None:
    """``roles``: dimension of ``w`` -> role; stored per original axis."""
    by_axis = {axis: role for d, role in roles.items() for axis in w.axes[d]}
    self.records.setdefault(w.path, []).append((kind, use, by_axis))

  def resolve(self, path: str, problems: Problems) -> dict[int, str]:
    """One role per axis. An embedding lookup sets the layout first; a use
    that is the exact transpose of what is known (a tied ``attend``,
    ``x·Wᵀ``) agrees with it; anything else that disagrees is an error."""
    records = sorted(self.records[path], key=lambda r: r[0] != "gather")
    roles: dict[int, tuple[str, str]] = {}
    swap = {"inputs": "outputs", "outputs": "inputs", "stack": "stack"}
    for kind, use, by_axis in records:
      clash = [a for a, r in by_axis.items() if a in roles and roles[a][0] != r]
      if clash and kind == "dot":
        swapped = {a: swap[r] for a, r in by_axis.items()}
        if all(a not in roles or roles[a][0] == r for a, r in swapped.items()):
          by_axis, clash = swapped, []
      if clash:
        a = clash[0]
        problems.add(f"{path}: axis {a} is {roles[a][0]} in `{roles[a][1]}` but "
                     f"{by_axis[a]} in `{use}`; a weight used in two incompatible ways "
                     "cannot get one LoRA layout: state `axes=` for it, or exclude it "
                     "from targets")
        return {}
      for a, r in by_axis.items():
        roles.setdefault(a, (r, use))
    return {a: r for a, (r, _) in roles.items()}


def _describe(eqn) -> str:
  text = str(eqn).strip().splitlines()
  return text[0][:160] if text else eqn.primitive.name


def _reshape_axes(w: _Weight, old_shape, new_shape) -> _Weight | None:
  """Original axes per new dimension, grouping by cumulative products."""
  old = [(a, n) for a, n in zip(w.axes, old_shape) if n != 1]
  out: list[tuple[int, ...]] = []
  i = 0
  pending: list[int] = []
  for n in new_shape:
    if n == 1:
      out.append(())
      continue
    size, group = 1, list(pending)
    while size < n and i < len(old):
      group.extend(old[i][0])
      size *= old[i][1]
      i += 1
    if size != n:
      if size % n:
        return None
      pending = group  # one old axis split into several new ones
      out.append(tuple(dict.fromkeys(group)))
      continue
    pending = []
    out.append(tuple(dict.fromkeys(group)))
  return _Weight(w.path, tuple(out))


def _walk(jaxpr: jcore.Jaxpr, values: list[Any], uses: _Uses) -> None:
  env: dict[Any, Any] = {v: val for v, val in zip(jaxpr.invars, values)}

  def read(v):
    return None if isinstance(v, jcore.Literal) else env.get(v)

  def sub(closed, vals):
    inner = closed.jaxpr if isinstance(closed, jcore.ClosedJaxpr) else closed
    _walk(inner, list(vals), uses)

  for eqn in jaxpr.eqns:
    ins = [read(v) for v in eqn.invars]
    if not any(isinstance(x, _Weight) for x in ins):
      continue
    name, p = eqn.primitive.name, eqn.params
    for x in ins:
      if isinstance(x, _Weight):
        uses.used.add(x.path)
    w = ins[0] if isinstance(ins[0], _Weight) else None
    out: Any = None
    if name in _PASS and w is not None:
      out = w
    elif name == "transpose":
      out = _Weight(w.path, tuple(w.axes[d] for d in p["permutation"]))
    elif name in ("reshape", "squeeze", "broadcast_in_dim", "expand_dims") and w is not None:
      new_shape = eqn.outvars[0].aval.shape
      out = _reshape_axes(w, eqn.invars[0].aval.shape, new_shape)
    elif name in ("slice", "dynamic_slice") and w is not None:
      shape = eqn.invars[0].aval.shape
      sizes = eqn.outvars[0].aval.shape
      layer = {d: "stack" for d, (n, m) in enumerate(zip(shape, sizes)) if m == 1 and n > 1}
      if layer:  # one entry of an axis: a layer of a stack
        uses.record(w, layer, _describe(eqn), kind="slice")
      out = w
    elif name == "dot_general":
      (lc, rc), (lb, rb) = p["dimension_numbers"]
      for x, c, b in ((ins[0], lc, lb), (ins[1], rc, rb)):
        if not isinstance(x, _Weight):
          continue
        roles = {d: "inputs" if d in c else "stack" if d in b else "outputs"
                 for d in range(len(x.axes))}
        uses.record(x, roles, _describe(eqn), kind="dot")
    elif name == "conv_general_dilated" and isinstance(ins[1], _Weight):
      spec = p["dimension_numbers"].rhs_spec
      roles = {d: "inputs" for d in spec[1:]}
      roles[spec[0]] = "outputs"
      uses.record(ins[1], roles, _describe(eqn), kind="conv")
    elif name == "gather" and w is not None:
      dn, sizes = p["dimension_numbers"], p["slice_sizes"]
      shape = eqn.invars[0].aval.shape
      roles = {d: "outputs" if sizes[d] == n and d not in dn.collapsed_slice_dims
               else "inputs" for d, n in enumerate(shape)}
      uses.record(w, roles, _describe(eqn), kind="gather")
    elif name in ("jit", "pjit", "closed_call", "core_call", "remat2", "checkpoint",
                  "custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr"):
      closed = p.get("jaxpr") or p.get("call_jaxpr") or p.get("fun_jaxpr")
      if closed is not None:
        sub(closed, ins)
    elif name == "scan":
      nc, nk = p["num_consts"], p["num_carry"]
      xs = []
      for x in ins[nc + nk:]:
        if isinstance(x, _Weight):
          uses.record(x, {0: "stack"}, _describe(eqn), kind="scan")
          x = _Weight(x.path, x.axes[1:])
        xs.append(x)
      sub(p["jaxpr"], [*ins[:nc], *ins[nc:nc + nk], *xs])
    elif name == "cond":
      for branch in p["branches"]:
        sub(branch, ins[1:])
    elif name == "while":
      nc, nb = p["cond_nconsts"], p["body_nconsts"]
      sub(p["body_jaxpr"], [*ins[nc:nc + nb], *ins[nc + nb:]])
    if out is not None and not eqn.primitive.multiple_results:
      env[eqn.outvars[0]] = out


def infer_axes(fn: Callable, params: Any, *args, **kwargs) -> dict[str, Axes]:
  """Each weight's `Axes`, read from how ``fn(params, *args)`` uses it.

  Args:
    fn: a function whose first argument is the parameter tree (e.g.
      ``model.apply``), as `jlora.lora` takes it.
    params: the base tree.
    *args, **kwargs: example inputs; only their shapes and dtypes matter.

  Returns:
    ``{path: Axes}`` (``/``-joined paths, in index form) for every weight of
    rank ≥ 2 that ``fn`` contracts, ready for ``lorify(..., axes=...)``;
    weights it never contracts are absent.

  Raises:
    LoraError: a weight used in two incompatible ways, naming both uses.

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> params = {"linear": {"weight": jnp.ones((6, 10))}}  # (out, in)
    >>> fn = lambda p, x: x @ p["linear"]["weight"].T
    >>> jlora.infer_axes(fn, params, jnp.ones((2, 10)))
    {'linear/weight': Axes(stack=(), inputs=(1,), outputs=(0,))}
  """
  from jlora import _structure
  params = _structure.read(params, what="the tree passed to infer_axes")[0]
  t = trace(fn, params, args, kwargs)
  paths = [path_str(p) for p in t.paths]
  weights = [_Weight(p, tuple((k,) for k in range(x.ndim))) if x.ndim >= 2 else None
             for p, x in zip(paths, t.leaves)]
  uses = _Uses()
  _walk(t.jaxpr.jaxpr, [*weights, *([None] * len(t.args))], uses)
  problems = Problems("jlora: cannot infer the weights' axes from their use")
  out: dict[str, Axes] = {}
  shapes = {p: x.shape for p, x in zip(paths, t.leaves)}
  for path in uses.records:
    roles = uses.resolve(path, problems)
    ndim = len(shapes[path])
    by = {r: tuple(k for k in range(ndim) if roles.get(k) == r)
          for r in ("stack", "inputs", "outputs")}
    if len(roles) < ndim or not by["inputs"] or not by["outputs"]:
      continue  # not contracted as a weight (e.g. only sliced): no layout
    out[path] = Axes(stack=by["stack"], inputs=by["inputs"], outputs=by["outputs"])
  problems.raise_if_any()
  return out


def contracted(axes: Mapping[str, Axes]) -> Callable[[str, Any], bool]:
  """A targets predicate: the weights that `infer_axes` found."""
  return lambda path, leaf: path in axes
