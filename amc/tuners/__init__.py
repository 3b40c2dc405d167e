"""amc.tuners"""
