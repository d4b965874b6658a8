"""rtkit.cli"""
