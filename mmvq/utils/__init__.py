from .env import collect_env, print_env

__all__ = ['collect_env', 'print_env']
