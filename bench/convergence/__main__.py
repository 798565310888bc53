from bench.convergence.run import main

main()
