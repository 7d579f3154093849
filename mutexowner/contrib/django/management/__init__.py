"""Management commands of mutexowner.contrib.django."""
