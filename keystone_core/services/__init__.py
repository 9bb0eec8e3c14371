"""Domain services: the only code that changes rows; routers and ops call these."""
