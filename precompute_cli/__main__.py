from precompute_cli.cli import main

main()
