"""rtkit.eval"""
