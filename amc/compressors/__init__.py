"""amc.compressors"""
