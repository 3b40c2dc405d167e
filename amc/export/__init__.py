"""amc.export"""
