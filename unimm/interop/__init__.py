"""Weight conversion to and from other libraries' checkpoint layouts."""
