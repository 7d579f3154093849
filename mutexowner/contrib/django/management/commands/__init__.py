"""``python manage.py mutexowner``."""
