from d2d_cli.main import main

main()
