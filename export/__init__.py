"""rtkit.export"""
