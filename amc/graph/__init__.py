"""amc.graph"""
