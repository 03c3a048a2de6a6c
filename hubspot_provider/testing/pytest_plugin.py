"""pytest fixtures"""
