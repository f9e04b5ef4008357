"""mmfm.data"""
