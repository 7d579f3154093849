"""A minimal Django project that runs a singleton worker with mutexowner."""
