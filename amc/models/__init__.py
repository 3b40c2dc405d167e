"""amc.models"""
