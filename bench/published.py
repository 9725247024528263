"""Published numbers we compare against, with their sources. Errors in percent.

He, Zhang, Ren, Sun. "Deep Residual Learning for Image Recognition." CVPR 2016 (arXiv:1512.03385,
2015), Table 6: classification error on the CIFAR-10 test set, recipe of sec. 4.2 (our `he2015`).
ResNet-110 is "best of 5 runs", with mean +- std over the 5 runs in brackets. The plain nets
appear only in Figure 6 (training curves), without a table, so they have no number here.
"""

CITATION = "He et al. 2015, Deep Residual Learning for Image Recognition, Table 6 (CIFAR-10 test error)"

# depth -> test error (%) of the residual net (option A shortcuts)
HE2015_RESNET_TEST_ERR = {20: 8.75, 32: 7.51, 44: 7.17, 56: 6.97, 110: 6.43, 1202: 7.93}
# ResNet-110: the best of 5 runs is 6.43; the mean over the 5 is 6.61 +- 0.16
HE2015_RESNET110_MEAN_SD = (6.61, 0.16)
# depth -> (params, multiply-adds) of Table 6 / sec. 4.2, for reference
HE2015_TABLE6_PARAMS = {20: 0.27e6, 32: 0.46e6, 44: 0.66e6, 56: 0.85e6, 110: 1.7e6, 1202: 19.4e6}
