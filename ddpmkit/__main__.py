from ddpmkit.cli import main

main()
