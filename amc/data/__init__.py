"""amc.data"""
