from .classmap import ClassMap
from .config import load_config, mim_root, register_config_scope, resolve_config_path
from .env import collect_env, print_env

__all__ = ['ClassMap', 'collect_env', 'print_env', 'load_config', 'resolve_config_path', 'mim_root',
           'register_config_scope']
