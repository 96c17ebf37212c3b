"""model/ops"""
