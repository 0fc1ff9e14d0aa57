"""Train steps: one shared body (`body`), three forms (`forms`: ``jit``,
``pmap``, mesh), the state they update (`state`), where arrays are placed
(`placement`), and `train_step` itself (`step`)."""

from jlora._train.state import TrainState as TrainState
from jlora._train.state import TrainStep as TrainStep
from jlora._train.step import train_step as train_step
