from . import utils
from .version import __version__
