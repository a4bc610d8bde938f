"""The ``imageguard`` command line: parse arguments, call library functions, print.

The top of the import graph: may import everything, nothing imports it (except ``agent.__main__``).
"""
