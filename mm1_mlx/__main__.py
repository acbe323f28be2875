from mm1_mlx.cli import main

main()
