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


# Published CIFAR-10 test errors (%) of the degradation fixes resbench trains side by side, each with its
# source, for the report's methods table. Only numbers read in their source are listed; where the
# source's recipe or topology differs from ours (all of them: other schedules, augmentation such as
# Fixup's mixup, other nets), the note says so: they locate a method, they are not a target.
METHODS = [
    dict(method="highway", depth=19, error=7.54, note="mean 7.72 ± 0.16; 2.3M params, not our topology",
         source="He et al. 2015, Table 6 (citing Srivastava et al. 2015)"),
    dict(method="highway", depth=32, error=8.80, note="1.25M params, not our topology",
         source="He et al. 2015, Table 6 (citing Srivastava et al. 2015)"),
    dict(method="resnet", depth=56, error=7.74, note="single run, their recipe (ReZero's notebook)",
         source="tbachlechner/ReZero-examples README: 'Vanilla - 7.74'"),
    dict(method="fixup", depth=56, error=7.5, note="single run, their recipe",
         source="tbachlechner/ReZero-examples README: 'FixUp - 7.5'"),
    dict(method="rezero", depth=56, error=6.38, note="single run, their recipe",
         source="tbachlechner/ReZero-examples README: 'ReZero - 6.38'"),
]
# Not listed, for want of a source read here: Fixup's own ResNet-110 numbers (Zhang et al. 2019, Table 2: the
# paper could not be opened from the machines resbench is developed on; its code, hongyi-zhang/Fixup, states the
# recipe the fixup2019 preset follows but no result), SkipInit's, DiracNets' and TAT's CIFAR numbers (their nets
# differ from ours in width or depth). Add a number here with its source once it has been read there.

# He et al. 2015, Table 2: top-1 error (%, 10-crop testing) on ImageNet validation; the ResNets with option A
# shortcuts (identity, zero-padding where the dimensions grow), as our he2015-imagenet preset builds them.
HE2015_IMAGENET_TOP1_10CROP = {("plain", 18): 27.94, ("plain", 34): 28.54, ("resnet", 18): 27.88, ("resnet", 34): 25.03}
IMAGENET_CITATION = "He et al. 2015, Table 2 (ImageNet val, top-1 error, 10-crop testing)"
