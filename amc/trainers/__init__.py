"""amc.trainers"""
