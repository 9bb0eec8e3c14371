"""End-to-end tests: whole processes as a user starts them."""
