"""A method's arrays on a multi-axis weight <-> the same arrays on its 2-D
``(in, out)`` view, through the method's own axis labels: input axes become
one ``in`` axis, output axes one ``out`` axis, the method's own axes (a rank)
stay. So `Method`'s PEFT hooks only ever see 2-D weights."""

from __future__ import annotations

import math

import numpy as np

from jlora.methods.base import Method, WeightLabels


def _labels(method: Method, ndim: int):
  inputs = tuple(f"in{k}" for k in range(method.inputs))
  outputs = tuple(f"out{k}" for k in range(ndim - method.inputs))
  return inputs, outputs, method.labels(WeightLabels((), inputs, outputs), "peft")


def _order(labels, inputs, outputs):
  ins = [labels.index(l) for l in inputs if l in labels]
  outs = [labels.index(l) for l in outputs if l in labels]
  own = [k for k in range(len(labels)) if k not in ins and k not in outs]
  return ins, own, outs


def to_2d(method: Method, weight_shape, arrays) -> tuple[np.ndarray, ...]:
  """Each array with its input axes flattened in front, outputs at the back."""
  inputs, outputs, labels = _labels(method, len(weight_shape))
  out = []
  for array, lab in zip(arrays, labels):
    array = np.asarray(array)
    ins, own, outs = _order(lab, inputs, outputs)
    moved = np.transpose(array, ins + own + outs)
    shape = (([math.prod(array.shape[k] for k in ins)] if ins else [])
             + [array.shape[k] for k in own]
             + ([math.prod(array.shape[k] for k in outs)] if outs else []))
    out.append(np.ascontiguousarray(moved.reshape(shape)))
  return tuple(out)


def from_2d(method: Method, weight_shape, arrays) -> tuple[np.ndarray, ...]:
  """The inverse of `to_2d`: arrays in the method's own layout on the weight."""
  inputs, outputs, labels = _labels(method, len(weight_shape))
  shapes = method.shapes(tuple(weight_shape))
  out = []
  for array, lab, shape in zip(arrays, labels, shapes):
    ins, own, outs = _order(lab, inputs, outputs)
    perm = ins + own + outs
    if shape is None:
      shape = tuple(np.asarray(array).shape)
    moved = np.asarray(array).reshape([shape[k] for k in perm])
    out.append(np.transpose(moved, np.argsort(perm)))
  return tuple(out)


def weight_2d(weight, inputs: int) -> np.ndarray:
  w = np.asarray(weight)
  return w.reshape(math.prod(w.shape[:inputs]), -1)


def role_order(method: Method | None, weight) -> np.ndarray:
  """The weight with its axes in ``method``'s role order (inputs first)."""
  w = np.asarray(weight)
  order = tuple(getattr(method, "layout", ()) or ())
  return w.transpose(order) if order else w
