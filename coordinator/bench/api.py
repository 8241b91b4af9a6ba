"""placeholder"""
import argparse


def add_api_bench_args(p: argparse.ArgumentParser) -> None:
    pass


def run_api_bench(args):
    return {}
