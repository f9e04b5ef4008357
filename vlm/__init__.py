"""mmfm.vlm"""
