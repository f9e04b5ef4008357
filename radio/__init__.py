"""mmfm.radio"""
