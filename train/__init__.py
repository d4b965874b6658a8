"""rtkit.train"""
