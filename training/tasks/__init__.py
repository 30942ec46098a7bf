"""One module per task; TASKS maps the model name to its task class."""

from training.tasks.binary_add import BinaryAddTask
from training.tasks.digits import DigitsTask
from training.tasks.echo import EchoTask
from training.tasks.forecast import ForecastTask

TASKS = {t.name: t for t in (EchoTask, BinaryAddTask, DigitsTask, ForecastTask)}
